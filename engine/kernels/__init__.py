"""Python front of the fused ops in csrc/, their PyTorch references, and spec modules using them."""
