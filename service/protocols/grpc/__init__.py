"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``), beside REST on
the same data plane: ``server.start`` runs it on the service's event loop."""
