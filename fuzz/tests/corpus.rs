//! Replays the seed corpus (`fuzz/corpus/<target>/`: hand-made seeds, the
//! issue's nasty inputs, what libFuzzer kept and every input that once
//! broke a property) through its target's properties. A new finding goes
//! into its target's folder with the fix, so it stays fixed.

use std::path::Path;

#[test]
fn every_corpus_input_keeps_its_targets_properties() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut total = 0;
    let mut broken = Vec::new();
    for (name, check) in decoder_fuzz::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        files.sort();
        assert!(!files.is_empty(), "{name}: no seed");
        for f in &files {
            let data = std::fs::read(f).expect("corpus file");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                broken.push(format!(
                    "{name}/{}",
                    f.file_name().unwrap_or_default().display()
                ));
            }
        }
        total += files.len();
    }
    assert!(broken.is_empty(), "broke a property: {broken:#?}");
    eprintln!("replayed {total} corpus inputs");
}
