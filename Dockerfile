# imgsvc in a container. The same steps as `make run`: install requirements.txt, fetch the default model
# with its sha256 checked (detect.py --fetch), start python server.py. Not built on the development
# machine (it has no Docker engine); CI covers each step through make test.
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
# Downloaded at build time and checked against the sha256 in detect.MODELS; a mismatch fails the build.
RUN python detect.py --fetch efficientdet_lite0 --models-dir /app/models

RUN useradd --system --uid 10001 --home-dir /app imgsvc && mkdir -p /data && chown imgsvc /data
USER imgsvc
VOLUME /data
EXPOSE 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status != 200)"

CMD ["python", "server.py"]
