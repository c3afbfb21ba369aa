# imgsvc in a container. The same steps as `make run`: install requirements.txt, put the default model in
# place, start python server.py. The model comes from the build context when models/efficientdet_lite0.tflite
# is there (after `make model`, or copied in), so the build needs no download for it; else it is
# downloaded. Either way its sha256 is checked. Not built on the development machine (it has no Docker
# engine); tests/test_dockerfile.py runs the model and health-check steps.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    IMAGES_DB=/data/images.db \
    DETECT_MODEL=/app/models/efficientdet_lite0.tflite

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY *.py openapi.json ./
COPY static/ static/
# The model from the build context, if it is there: a wildcard that matches nothing copies nothing, and
# openapi.json is the source that always matches (COPY needs one).
COPY openapi.json model[s]/efficientdet_lite0.tflit[e] models/
# Checked against the sha256 in detect.MODELS (a wrong file fails the build), else downloaded and checked.
RUN rm models/openapi.json && \
    if [ -f models/efficientdet_lite0.tflite ]; then \
      python -c 'import detect, hashlib, sys; m = detect.MODELS[sys.argv[1]]; p = "models/" + m.filename; got = hashlib.sha256(open(p, "rb").read()).hexdigest(); sys.exit(None if got == m.sha256 else f"{p} from the build context has sha256 {got}, expected {m.sha256}: delete it (or run make model) and build again")' efficientdet_lite0; \
    else \
      python detect.py --fetch efficientdet_lite0 --models-dir models; \
    fi

RUN useradd --system --uid 10001 --home-dir /app imgsvc && mkdir -p /data && chown imgsvc /data
USER imgsvc
VOLUME /data
EXPOSE 8080

# On $PORT as the container runs (docker run -e PORT=9000 ...), not the port it was built with.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '8080') + '/health', timeout=4).status != 200)"

CMD ["python", "server.py"]
