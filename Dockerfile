FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -o /imagepipe ./cmd/imagepipe

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends qemu-utils util-linux ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /imagepipe /usr/local/bin/imagepipe
USER 65532:65532
ENTRYPOINT ["imagepipe"]
