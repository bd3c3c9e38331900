"""Step 5 of an image's path: the portable model file (``export``), loading it from a file
or an MLflow URI (``loading``), detections on images (``predict``; the request and answer
every served model shares, torch-free, in ``detections``) and the MLflow pyfunc model it is
logged and registered as (``pyfunc``); for deployment, one ONNX graph checked against torch
(``onnx``), run without torch (``onnx_runtime``) and served without torch (``onnx_pyfunc``),
its OpenVINO conversion (``openvino``), and the HTTP model server (``serving``)."""
