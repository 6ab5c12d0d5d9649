"""The ONNX artifact: what `sdsonnx export` writes and `sdsonnx validate` / `sdsonnx bench` read.

  files.py         the artifact's file names (model.onnx, model.onnx_data, sdsonnx.json, validation.json)
  checkpoint.py    readers of the checkpoint folder `sdsonnx run` writes (weights hash, report.json, weights)
  initializers.py  which ONNX initializer holds each torch Linear weight, and along which axis
  metadata.py      the `sdsonnx.*` metadata_props: per-initializer description, format, parse
  export.py        checkpoint -> artifact (optimum + metadata + manifest)
  validate.py      artifact (+ checkpoint) -> ValidationReport; a sibling of export.py, never its client
"""
