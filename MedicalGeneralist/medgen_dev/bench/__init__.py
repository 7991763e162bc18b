"""medgen_dev.bench."""
