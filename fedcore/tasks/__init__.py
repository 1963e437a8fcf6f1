"""The built-in tasks (see ``fedgen.core.task``): registered in the ``fedgen.tasks`` entry-point group.

| name | model | stored example | classes |
|---|---|---|---|
| ``mnist`` | FedGen's CNN (26,434 parameters) | uint8 [28, 28] | 10 |
| ``fashion-mnist`` | the same CNN | uint8 [28, 28] | 10 |
| ``fashion-mnist-resnet`` | a small residual network | uint8 [28, 28] | 10 |
| ``cifar10`` | a small residual network (about 0.18 M parameters) | uint8 [3, 32, 32] | 10 |
| ``har`` | a 1-D convolutional network over sensor windows | float32 [9, 128] | 6 |
"""
