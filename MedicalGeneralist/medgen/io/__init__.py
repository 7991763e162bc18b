"""medgen.io."""
