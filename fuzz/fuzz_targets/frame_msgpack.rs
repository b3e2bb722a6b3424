#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| decoder_fuzz::frame_msgpack(data));
