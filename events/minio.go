package events

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"time"
)

// Notification is one MinIO bucket notification as published on
// SubjectS3Events. MinIO sends one record per message, but the format
// allows several.
type Notification struct {
	EventName string
	Records   []Record
}

// Record is one object event, with its key already decoded.
type Record struct {
	EventName    string
	EventTime    time.Time
	Bucket       string
	Key          string
	Size         int64
	ETag         string
	VersionID    string
	ContentType  string
	Sequencer    string
	UserMetadata map[string]string
}

// Created reports whether the record is an s3:ObjectCreated:* event.
func (r Record) Created() bool { return strings.HasPrefix(r.EventName, "s3:ObjectCreated:") }

// wire mirrors MinIO's JSON (pkg/event.Event); only what imagepipe reads.
type wireNotification struct {
	EventName string `json:"EventName"`
	Key       string `json:"Key"`
	Records   []struct {
		EventName string `json:"eventName"`
		EventTime string `json:"eventTime"`
		S3        struct {
			Bucket struct {
				Name string `json:"name"`
			} `json:"bucket"`
			Object struct {
				Key          string            `json:"key"`
				Size         int64             `json:"size"`
				ETag         string            `json:"eTag"`
				VersionID    string            `json:"versionId"`
				ContentType  string            `json:"contentType"`
				UserMetadata map[string]string `json:"userMetadata"`
				Sequencer    string            `json:"sequencer"`
			} `json:"object"`
		} `json:"s3"`
	} `json:"Records"`
}

// ParseNotification decodes a MinIO notification. MinIO query-escapes each
// record's object key ("/" as %2F, " " as "+", "+" as %2B), so the key is
// unescaped exactly once here and never again downstream.
func ParseNotification(b []byte) (Notification, error) {
	var w wireNotification
	if err := json.Unmarshal(b, &w); err != nil {
		return Notification{}, fmt.Errorf("parse minio notification: %w", err)
	}
	if len(w.Records) == 0 {
		return Notification{}, errors.New("parse minio notification: no records")
	}
	n := Notification{EventName: w.EventName, Records: make([]Record, 0, len(w.Records))}
	for i, wr := range w.Records {
		if wr.EventName == "" {
			return Notification{}, fmt.Errorf("parse minio notification: record %d has no eventName", i)
		}
		if wr.S3.Bucket.Name == "" {
			return Notification{}, fmt.Errorf("parse minio notification: record %d has no bucket", i)
		}
		key, err := url.QueryUnescape(wr.S3.Object.Key)
		if err != nil {
			return Notification{}, fmt.Errorf("parse minio notification: record %d key %q: %w", i, wr.S3.Object.Key, err)
		}
		if key == "" {
			return Notification{}, fmt.Errorf("parse minio notification: record %d has no object key", i)
		}
		if wr.S3.Object.Size < 0 {
			return Notification{}, fmt.Errorf("parse minio notification: record %d has negative size", i)
		}
		var at time.Time
		if wr.EventTime != "" {
			if at, err = time.Parse(time.RFC3339Nano, wr.EventTime); err != nil {
				return Notification{}, fmt.Errorf("parse minio notification: record %d eventTime: %w", i, err)
			}
		}
		n.Records = append(n.Records, Record{
			EventName:    wr.EventName,
			EventTime:    at,
			Bucket:       wr.S3.Bucket.Name,
			Key:          key,
			Size:         wr.S3.Object.Size,
			ETag:         strings.Trim(wr.S3.Object.ETag, `"`),
			VersionID:    wr.S3.Object.VersionID,
			ContentType:  wr.S3.Object.ContentType,
			Sequencer:    wr.S3.Object.Sequencer,
			UserMetadata: wr.S3.Object.UserMetadata,
		})
	}
	return n, nil
}
