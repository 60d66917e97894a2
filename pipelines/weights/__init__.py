"""Importing the authors' released weights: one module per source format, each mapping by layer names.

`caffe` reads `.caffemodel` files; `releases` maps the releases' tensor names (Caffe FCN and its PyTorch
port, hszhao/semseg PSPNet, MMSegmentation PSPNet) onto segpipe models. The stage is
`pipelines.weights.import_weights`.
"""
