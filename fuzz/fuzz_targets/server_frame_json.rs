#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| decoder_fuzz::server_frame_json(data));
