"""TheyChat's line client: like `nc`, standard library only."""
