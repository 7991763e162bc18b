"""medgen_dev.train."""
