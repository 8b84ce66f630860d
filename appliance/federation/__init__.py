"""Learning across the fleet without leaving the home: DP accounting, audience segments, (Flower) training."""
