"""Running the appliance: supervisor, logging, doctor."""
