"""Thin gRPC client for the AMC image-search ranker served by Triton."""
