"""The household's privacy page: a small local web app in front of the appliance's own gRPC API."""
