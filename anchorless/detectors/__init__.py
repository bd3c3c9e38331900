"""Pure PyTorch detectors and their parts.

Backbones, necks, heads, label assigners, losses, post-processing and COCO
evaluation helpers, one file per detector over shared building blocks. A detector
built here can be trained and tested with a plain PyTorch loop: nothing in this
package imports ray, deepspeed or mlflow.
"""
