"""Vision: face detection, emotion classification, affect mapping and tracking on ONNX Runtime.

Nothing here keeps or emits pixels: outputs are boxes, keypoints, probabilities and derived scores.
"""
