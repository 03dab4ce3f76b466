"""One LightningModule per stage, each over a plain nn.Module of foundv2.nn."""
