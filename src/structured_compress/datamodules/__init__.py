"""Lightning datamodules, one file per dataset family."""
