"""Plain nn.Modules: MVAM, FRM, the view-aligned U-Net, backbones, memory bank."""
