"""Plain nn.Modules: MVAM, FRM, the view-aligned U-Net, backbones (bank: vsad_lightning.bank)."""
