"""Models and data in and out: the ModelHandle, loading every format (ONNX, TorchScript, .pt2,
state_dict + code, Hugging Face folders), conversions, data files, the demo zoo and exports.
"""
