"""The zoo: models shipped with the package, with the code that made them.

``pretrained`` loads a bundle by name (:func:`~genie_kernels.zoo.pretrained.load_pretrained`);
``weights/<name>/`` holds each bundle's files (ε-network, distilled head, their JSON
configs, PROVENANCE.md, a grid of samples); ``mnist/`` the MNIST reader and the base-model
trainer behind the bundled MNIST UNet.  Sits above ``sampling`` (the trainer draws sample
grids with it) and below the CLI.
"""
