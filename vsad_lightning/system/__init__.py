"""The LightningModule (the system) that wires the models together."""
