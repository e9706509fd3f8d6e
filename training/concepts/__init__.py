"""Training tools of the concept families: test-time interventions."""
