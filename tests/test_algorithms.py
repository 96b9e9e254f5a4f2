"""Every algorithm record agrees with its aggregator and with itself."""

import pytest

from fedjax_lora.aggregators.base import COMBINES
from fedjax_lora.algorithms import ALGORITHMS, FACTORS, MEAN_COMBINES, get_algorithm
from fedjax_lora.experiment import secagg_compatible


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_record_sends_what_its_aggregator_takes_and_never_a_personal_factor(name):
  alg = ALGORITHMS[name]
  aggregator = alg.make_aggregator()
  assert aggregator.name == alg.name == name
  assert aggregator.sends == alg.sends
  assert set(alg.sends) <= set(alg.train_factors) <= set(FACTORS)
  assert not set(alg.personal_factors) & set(alg.sends)
  assert set(alg.personal_factors) | set(alg.sends) == set(alg.train_factors)
  assert aggregator.combine in COMBINES


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_a_record_states_why_it_needs_single_uploads_exactly_when_its_aggregator_does(name):
  alg = ALGORITHMS[name]
  combine = alg.make_aggregator().combine
  assert bool(alg.individual) == (combine not in MEAN_COMBINES)
  assert secagg_compatible(name) == (combine in MEAN_COMBINES and not alg.needs_validation)
  assert bool(alg.secagg_obstacle()) != secagg_compatible(name)


def test_site_state_follows_the_client_behaviour():
  assert get_algorithm("fedsa_lora").personal_factors == ("b",)
  assert get_algorithm("fedsa_lora").site_state == ("personal",)
  assert get_algorithm("ffa_lora").personal_factors == ()
  assert get_algorithm("dual_lora").site_state == ("local",)
  assert get_algorithm("scaffold").site_state == ("control",)
  assert get_algorithm("fedavg").site_state == ()


def test_options_are_the_factory_parameters_and_others_are_refused():
  assert get_algorithm("fedadam").option_names() == ("server_lr", "beta1", "beta2", "tau")
  assert get_algorithm("fedavg").option_names() == ()
  with pytest.raises(ValueError, match="'trimmed_mean' has no option.*momentum.*takes trim"):
    get_algorithm("trimmed_mean").make_aggregator(momentum=0.5)


def test_the_client_behaviour_is_the_records():
  prox = get_algorithm("fedprox").client_config(prox_mu=0.1, learning_rate=1e-3)
  assert (prox.prox_mu, prox.learning_rate, prox.train_factors) == (0.1, 1e-3, ("a", "b"))
  assert get_algorithm("fedavg").client_config(prox_mu=0.1).prox_mu == 0.0
  assert get_algorithm("ffa_lora").client_config().train_factors == ("b",)
  assert get_algorithm("scaffold").client_config().scaffold
