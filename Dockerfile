# One image for every mlpe service: `docker run mlpe <command>` (see `mlpe --help`).
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLPE_STATE_DIR=/var/lib/mlpe
# The runtime pins (no test or lint tools): the same versions as requirements.lock.
COPY requirements-runtime.lock ./
RUN pip install --no-cache-dir -r requirements-runtime.lock
COPY . .
# A wheel, not an editable install: the image runs mlpe as a user installs it.
RUN pip install --no-cache-dir --no-deps . && rm -rf /app/build
ENTRYPOINT ["mlpe"]
CMD ["--help"]
