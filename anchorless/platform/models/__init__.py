"""Step 5 of an image's path: the portable model file (``export``), loading it from a file
or an MLflow URI (``loading``), detections on images (``predict``) and the MLflow pyfunc
model it is logged and registered as (``pyfunc``)."""
