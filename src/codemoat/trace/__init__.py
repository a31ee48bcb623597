"""codemoat.trace: which copy leaked, and who wrote this.

- `fingerprint.fingerprint_model(data, fmt, secret)`: a customer's spread-spectrum mark in the weights
  (called by `Vendor.seal`); `trace_stream.trace_files(suspect, original, secrets)` names the customer.
- `align`: undoes function-preserving permutations (MLP units, attention heads) before scoring.
- `gguf_io`, `st_io`: tensors of GGUF (any quantisation) and safetensors files as float32;
  `gguf_stream` reads a GGUF tensor by tensor, `quant` dequantises (llama.cpp) and edits integer codes.
- `fingerprint.stream_gguf`: the marked GGUF as pieces (`Vendor.seal` streams it); `trace_stream`: trace
  of two GGUF files a layer at a time; `logits`: next-token logits a batch at a time (bounded memory).
- `watermark.WatermarkProcessor(key)`: a logits processor (Kirchenbauer et al. 2023, gated by entropy
  as in SWEET); `watermark.detect` / `detect_text` test text against customers' keys.
- `vendor_io`: customers' secrets and recorded originals from the vendor directory.
"""
