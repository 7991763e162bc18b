"""medgen.core."""
