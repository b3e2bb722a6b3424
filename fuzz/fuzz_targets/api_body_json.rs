#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| decoder_fuzz::api_body_json(data));
