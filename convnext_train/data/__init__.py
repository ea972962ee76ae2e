"""Input pipeline: image transforms and Mixup/CutMix (`transforms`), ImageFolder datasets with clear
errors (`imagefolder`), and the bundled handwritten-digits demo dataset (`digits`)."""
