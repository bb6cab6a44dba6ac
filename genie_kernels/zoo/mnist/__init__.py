"""The bundled MNIST model's own code: the idx-file reader (``data``) and the trainer of
the base ε-UNet (``train_base``); its files are in ``genie_kernels/zoo/weights/mnist/``."""
