"""Configuration only: every value comes from environment variables read in `settings.env`."""
