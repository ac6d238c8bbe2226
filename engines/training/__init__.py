"""Training: PSSR/CAFI-style pairs made on the fly (crappifiers), the loop, ONNX export."""
