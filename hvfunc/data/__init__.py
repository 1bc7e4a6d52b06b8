"""Raw-video datasets: data.txt / data.json listings, frame and space rules, buckets, skip report.

  manifest   parse data.txt and data.json, validate fields, find duplicate names
  report     the skip report: every dropped line or clip with its reason, counted
  video      frame index selection (fps resampling, 4k+1, cp, random window) and decoding
  transform  output size (fixed or dynamic resolution) and pixels -> [-1, 1]
  buckets    (frames, height, width) buckets and the resumable data-parallel sampler
  dataset    the map-style dataset that ties them together, and its collate function
  synthetic  a generator of datasets in the same format (moving coloured shapes)
Feature extraction (latents and text states) builds on this and lives elsewhere.
"""
