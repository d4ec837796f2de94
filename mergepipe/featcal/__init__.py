"""FeatCal: forward-order feature calibration of a merged model."""
