//! How a batch is cut into broker calls so that an aggregate's later event never reaches the
//! broker before the outcome of its earlier one is known (or the broker itself keeps that order
//! within a call).

use std::collections::HashMap;

/// Splits a batch (in position order) into waves, each in position order; returns indexes
/// into `batch`. `key` gives an item's (aggregate type, aggregate id, destination).
///
/// An aggregate's event goes one wave after its predecessor's, so wave k holds the k-th event
/// of every aggregate; except that with `together` (the broker keeps one aggregate's order
/// within a call and withholds its later messages after a failure, see
/// `Broker::keeps_aggregate_order`) it shares its predecessor's wave when both go to the same
/// destination, so a batch to one topic is one call.
pub fn waves<T>(batch: &[T], key: impl Fn(&T) -> (&str, &str, &str), together: bool) -> Vec<Vec<usize>> {
    // Per aggregate: the wave and destination of its latest event so far.
    let mut last: HashMap<(&str, &str), (usize, &str)> = HashMap::new();
    let mut waves: Vec<Vec<usize>> = Vec::new();
    for (i, item) in batch.iter().enumerate() {
        let (aggregate_type, aggregate_id, destination) = key(item);
        let wave = match last.get(&(aggregate_type, aggregate_id)) {
            None => 0,
            Some((wave, previous)) if together && *previous == destination => *wave,
            Some((wave, _)) => wave + 1,
        };
        last.insert((aggregate_type, aggregate_id), (wave, destination));
        if waves.len() <= wave {
            waves.push(Vec::new());
        }
        waves[wave].push(i);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (aggregate id, destination); one aggregate type.
    fn plan(batch: &[(&str, &str)], together: bool) -> Vec<Vec<usize>> {
        waves(batch, |(id, destination)| ("Item", id, destination), together)
    }

    #[test]
    fn wave_k_holds_the_kth_event_of_each_aggregate_in_position_order() {
        let batch = [("a", "t"), ("b", "t"), ("a", "t"), ("c", "t"), ("a", "t"), ("b", "t")];
        assert_eq!(plan(&batch, false), vec![vec![0, 1, 3], vec![2, 5], vec![4]]);
        assert!(plan(&[], false).is_empty());
    }

    #[test]
    fn with_a_broker_that_keeps_aggregate_order_a_batch_to_one_destination_is_one_wave() {
        let batch = [("a", "t"), ("b", "t"), ("a", "t"), ("a", "t")];
        assert_eq!(plan(&batch, true), vec![vec![0, 1, 2, 3]]);
    }

    #[test]
    fn an_aggregate_that_changes_destination_starts_a_new_wave_even_when_kept_in_order() {
        let batch = [("a", "t"), ("a", "t"), ("b", "u"), ("a", "u"), ("b", "u"), ("a", "t")];
        assert_eq!(plan(&batch, true), vec![vec![0, 1, 2, 4], vec![3], vec![5]]);
    }

    #[test]
    fn aggregates_of_different_types_with_one_id_are_apart() {
        let batch = [("Item", "1"), ("Warehouse", "1"), ("Item", "1")];
        let planned = waves(&batch, |(kind, id)| (kind, id, "t"), false);
        assert_eq!(planned, vec![vec![0, 1], vec![2]]);
    }
}
