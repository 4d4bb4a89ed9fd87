"""TinySAM vit_t in PyTorch: the TinyViT-5M encoder and the builder that assembles SAM around it."""
