"""The gRPC layer: servicers and interceptors. Thin: validate, call the domain, map errors."""
