"""Work off the request path: training, Gal & Ghahramani's UCI protocol, the demo models,
data sets, evaluation metrics and the report. Never imports serving or protocols."""
