"""medgen_dev."""
