-- The first event of each stream, by pipeline: deleting a pipeline finds its runs in the event
-- store itself (a read model may lag), without reading every event (logs included) of the pipeline.
CREATE INDEX IF NOT EXISTS events_pipeline_streams ON events (pipeline_id, position)
    WHERE stream_version = 1 AND pipeline_id IS NOT NULL;
