"""`lmkiln verify`: compare a reference model with a candidate artifact, across runners."""
