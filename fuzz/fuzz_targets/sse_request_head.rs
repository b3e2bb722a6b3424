#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| decoder_fuzz::sse_request_head(data));
