"""Networks: the shared output type and SeLa's ResNet with clustering heads."""
