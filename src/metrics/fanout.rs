//! One recorder that hands every measurement to several (Prometheus and
//! StatsD side by side).

use std::sync::Arc;

use metrics::{
    Counter, CounterFn, Gauge, GaugeFn, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder,
    SharedString, Unit,
};

type Boxed = Box<dyn Recorder + Send + Sync>;

/// Forwards to each recorder (to the only one directly, when there is one).
pub(super) struct Fanout {
    recorders: Vec<Boxed>,
}

impl Fanout {
    pub(super) fn new(recorders: Vec<Boxed>) -> Fanout {
        Fanout { recorders }
    }
}

struct Counters(Vec<Counter>);
struct Gauges(Vec<Gauge>);
struct Histograms(Vec<Histogram>);

impl CounterFn for Counters {
    fn increment(&self, value: u64) {
        for c in &self.0 {
            c.increment(value);
        }
    }
    fn absolute(&self, value: u64) {
        for c in &self.0 {
            c.absolute(value);
        }
    }
}

impl GaugeFn for Gauges {
    fn increment(&self, value: f64) {
        for g in &self.0 {
            g.increment(value);
        }
    }
    fn decrement(&self, value: f64) {
        for g in &self.0 {
            g.decrement(value);
        }
    }
    fn set(&self, value: f64) {
        for g in &self.0 {
            g.set(value);
        }
    }
}

impl HistogramFn for Histograms {
    fn record(&self, value: f64) {
        for h in &self.0 {
            h.record(value);
        }
    }
}

impl Recorder for Fanout {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in &self.recorders {
            r.describe_counter(key.clone(), unit, description.clone());
        }
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in &self.recorders {
            r.describe_gauge(key.clone(), unit, description.clone());
        }
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        for r in &self.recorders {
            r.describe_histogram(key.clone(), unit, description.clone());
        }
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        match self.recorders.as_slice() {
            [one] => one.register_counter(key, metadata),
            all => Counter::from_arc(Arc::new(Counters(
                all.iter()
                    .map(|r| r.register_counter(key, metadata))
                    .collect(),
            ))),
        }
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        match self.recorders.as_slice() {
            [one] => one.register_gauge(key, metadata),
            all => Gauge::from_arc(Arc::new(Gauges(
                all.iter()
                    .map(|r| r.register_gauge(key, metadata))
                    .collect(),
            ))),
        }
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        match self.recorders.as_slice() {
            [one] => one.register_histogram(key, metadata),
            all => Histogram::from_arc(Arc::new(Histograms(
                all.iter()
                    .map(|r| r.register_histogram(key, metadata))
                    .collect(),
            ))),
        }
    }
}
