"""The protocol-independent data plane: a request in (model, rows, MC parameters), an
answer out, with checks, seeds, admission, batching, deadlines and threads inside;
metrics and the access log. Front doors (service.protocols) translate onto it."""
