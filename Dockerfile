# The pipemon image: the exporter (default command), the webhook sink and the demo traffic generator.
#   docker build -t pipemon .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# .dockerignore lets in only what the install needs: pyproject.toml, README.md, exporter/ and pipelines.yaml.
COPY . /src
RUN pip install '/src[postgres]' \
    && install -d /etc/pipemon \
    && install -m 0644 /src/pipelines.yaml /etc/pipemon/pipelines.yaml \
    && rm -rf /src \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pipemon \
    && install -d -o pipemon -g pipemon -m 0750 /var/lib/pipemon

USER pipemon
WORKDIR /var/lib/pipemon
VOLUME ["/var/lib/pipemon"]
EXPOSE 9464

# slim has no curl: ask the exporter's liveness endpoint with the standard library.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/-/healthy', timeout=2)"]

CMD ["pipemon", "serve", "--listen", "0.0.0.0:9464", "--registry", "/etc/pipemon/pipelines.yaml", "--state-dir", "/var/lib/pipemon"]
