# CPU serving image for one deploykit artifact (ONNX Runtime CPU, BentoML; no torch).
#
#   deploykit compress models/resnet10t_fmnist.pth --int8 --data fashion-mnist --out model.deploykit
#   docker build --build-arg ARTIFACT=model.deploykit -t deploykit-serve .
#   docker run --rm -p 3000:3000 --cpus 2 deploykit-serve
#   curl -F image=@shoe.png http://127.0.0.1:3000/classify
#
# (`bentoml build && bentoml containerize` is the other route: it packages the store model instead.)
FROM python:3.11-slim

ARG ARTIFACT=model.deploykit
ENV BENTOML_DO_NOT_TRACK=True \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    DEPLOYKIT_ARTIFACT=/srv/artifact \
    DEPLOYKIT_WORKERS=1 \
    DEPLOYKIT_MODEL_WORKERS=1

WORKDIR /srv/app
# Dependencies first (a layer that survives code edits); constraints pin the versions the tests ran with.
COPY pyproject.toml constraints.txt ./
COPY deploykit ./deploykit
# jemalloc: with glibc malloc the front worker's RSS kept growing under load (~0.8 KB per request after the
# first minute, Python heap flat); with jemalloc it is flat (docs/serving.md, "Memory"). The link gives one
# path on every architecture.
RUN apt-get update && apt-get install -y --no-install-recommends libjemalloc2 && rm -rf /var/lib/apt/lists/* \
 && ln -s "$(find /usr/lib -name libjemalloc.so.2 | head -n 1)" /usr/local/lib/libjemalloc.so.2 \
 && (test -f README.md || echo "# deploykit" > README.md) \
 && pip install -c constraints.txt ".[serve]" psutil \
 && useradd --create-home --uid 10001 serve
ENV LD_PRELOAD=/usr/local/lib/libjemalloc.so.2
COPY ${ARTIFACT} /srv/artifact

USER serve
ENV BENTOML_HOME=/home/serve/bentoml
EXPOSE 3000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:3000/readyz').status != 200)"
# bentoml serve handles SIGTERM: in-flight requests finish, then the workers stop (graceful shutdown).
CMD ["bentoml", "serve", "deploykit.serving:Classifier", "--host", "0.0.0.0", "--port", "3000"]
